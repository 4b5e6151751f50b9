"""Compressing a corpus: one artifact per document, over one process or many (torchrun), resumable.

- listing.py: what a corpus holds (a folder of .txt/.md, a glob, or a JSONL of {"id", "text"}), each document's
  id (its artifact's name, validated) and its cost (UTF-8 bytes), without reading any text into memory to keep it;
- sharding.py: which rank compresses which document (greedy longest-processing-time on the costs);
- distributed.py: torch.distributed set-up when launched by torchrun, the rank's device(s);
- manifest.py: the per-rank JSONL records (appended and fsynced per document) and their merge;
- runner.py: the loop of one rank (skip what is done and verifies, compress the rest, record failures, progress).
"""
