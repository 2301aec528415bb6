"""Frame codec: a small convolutional autoencoder that maps 64x64 RGB frames to a latent grid.

The world model is trained on these latents (as in the paper, which works in a VAE's latent space),
not on pixels. Modules: `autoencoder` (the model and its presets), `checkpoint` (safetensors +
JSON), `train` (the training loop behind `worldsim train-codec`).
"""
