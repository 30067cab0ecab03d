"""Training: the loop, the child process that runs it, one-or-many-process plumbing."""
