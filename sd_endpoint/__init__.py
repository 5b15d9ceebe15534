"""Stable Diffusion text-to-image behind the Hugging Face Inference Endpoints handler contract.

``handler.py`` at the repo root is the face the hosted runtime sees; the parts live here:

* ``settings``: every knob, read once from environment variables.
* ``schema``: the request and response models (validation, errors, docs, OpenAPI).
* ``engine``: loading the pipeline and generating one image.
* ``families``: what differs between model families, read from the model folder.
* ``imaging``: turning the image into PNG/JPEG/WebP bytes.
"""
