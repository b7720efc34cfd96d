"""The HTTP service: FastAPI app, dynamic batcher, engine (model + pre/post-processing), metrics."""
