"""The worker service: runs queued tasks in the background."""
