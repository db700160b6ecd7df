"""The adapter library: what `import adakron` gives (see adakron/__init__.py); nothing of training or serving."""
