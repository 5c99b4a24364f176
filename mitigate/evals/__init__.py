"""Evaluation suite: POPE, CHAIR (and Tri-HE later) on COCO-format data; batched, resumable runs."""
