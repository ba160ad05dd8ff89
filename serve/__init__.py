"""ddpm_engine.serve: an Engine as a service (Open Inference Protocol over HTTP, dynamic batching, Ray Serve)."""
