"""ftpipe: drop a dataset, get a fine-tuned, evaluated, registered model."""
__version__ = "0.1.0"
