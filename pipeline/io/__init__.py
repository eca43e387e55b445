"""Bytes in and out: audio decode/encode (audio.py), object storage and retries (storage.py), WebDataset
tars (shards.py), the output prefix with its markers, spill and lease (output.py), Parquet manifests
(manifest.py). No torch, no Ray."""
