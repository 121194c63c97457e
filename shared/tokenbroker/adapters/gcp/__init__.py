"""Google Cloud adapters: Secret Manager, Firestore, Pub/Sub.

The client libraries are heavy (hundreds of ms to import): every module here imports them
inside functions, so a function instance pays only for the clients it actually builds.
"""
