"""The artifact registry (local, S3, Hugging Face Hub stores). Not built yet."""
