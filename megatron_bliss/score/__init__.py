"""Scoring a shard: the score model over every stored sequence, data parallel and resumable."""
