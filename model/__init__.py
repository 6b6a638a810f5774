"""Plain-PyTorch Make-A-Video: networks, diffusion, samplers, CLIP. No Ray, Prefect or MLflow here."""
