"""Curation: raw high-resolution images and documents -> PS3 pre-training shards.

Paper section 2.1 and appendix A: masks -> salient boxes -> local/global captions for
natural images; OCR word/sentence boxes for documents. `pipeline.py` runs the stages on
Ray Data; the stages themselves run (and are tested) without Ray.
"""
