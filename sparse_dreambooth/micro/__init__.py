"""The micro world: a procedural, captioned image world small enough to pretrain an SDXL-architecture
model on a CPU, so DreamBooth can be shown (and tested) to personalise without downloading anything.

`world` draws captioned scenes, `subjects` holds the named instances users personalise on.
"""
