"""The exact training state: what a checkpoint holds and how it is written and read back.

``format`` names the files and records, ``capture`` snapshots live objects and writes them,
``restore`` validates and loads them back, ``codec`` turns nested ``state_dict()`` output
into JSON plus tensors, ``tensorfile`` streams safetensors files a tensor at a time,
``rng`` captures every random generator, ``pinned`` keeps the GPU staging buffers,
``host_memory`` decides whether a background copy fits, ``sizing`` predicts a checkpoint's size.
"""
