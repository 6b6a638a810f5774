"""The image data flow: LAION-style metadata -> filters -> img2dataset shards -> CLIP embeddings."""
