"""What the api and the worker share: settings, the task model, key names and the queue."""
