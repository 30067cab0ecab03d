"""Bottom layer: typed params, workspace paths, hashing, hardware, atomic files, the lock, secrets, console, progress, memory. Imports nothing else of qlora-ops."""
