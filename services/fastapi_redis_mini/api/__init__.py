"""The api service: accepts tasks over HTTP and answers with their status."""
