"""qlora-ops stages as plain, typed functions. Nothing here imports Prefect or flows/: the Prefect
wrappers, run states, retries and deployments live in flows/."""
