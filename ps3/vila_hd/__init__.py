"""VILA-HD: PS3 inside a multimodal LLM, with top-down patch selection driven by the LLM.

Paper section 3 and appendix C (`shared/papers/ps3_paper.txt`). The modules:

    llm.py            load a Qwen2-family causal LM + tokenizer from a path/URI; tiny ones for tests
    conversations.py  conversation samples: validation, chat-template tokenisation, shards, LLaVA import
    loader.py         ConversationLoader: planned, resumable batches; QA and grounding never mixed
    synth.py          synthetic high-res VQA whose answers need high resolution (the quickstart)
    hr_synth.py       high-res SFT data: low-res VQA images pasted on large solid canvases (figure 8, right)
    selection_data.py grounding questions from PS3 pre-training boxes and captions (figure 8, left)
    projector.py      2x2 spatial-to-channel merge + LayerNorm + 2-layer MLP to the LLM width
    model.py          VilaHD: PS3 encoder + projector + LLM, image token assembly, the two passes
    losses.py         token-selection loss (BCE + Dice per scale on the box map)
    evaluate.py       multiple-choice accuracy (high-res, low-res, chance) and selection recall
    infer.py          answers to questions about images (greedy or restricted to the options); selection PNGs
    benchmarks.py     4KPro- and V*-format benchmarks: reading, bad-input accounting, letters, scores
    sweep.py          benchmarks over selection settings: the table and plot of the paper's tables 7-8
    export.py         HF-style export directory, and loading it back
    params.py         the `vila_hd` task's params (torch-free: `platformctl validate` checks them)

Conversation sample (one webdataset sample, key K):
    K.json    {"conversations": [{"from": "human"|"gpt", "value": str}, ...],  # "<image>" placeholders
               "boxes": [[x0, y0, x1, y1] | null, ...],   # per image, pixels of the stored image
               "kind": "qa" | "grounding",                # grounding: selection loss only
               "source": str, "id": str}
    K.0.jpg, K.1.png, ...   the images, in placeholder order (jpg/png/webp)

Batch contract (what `loader.collate` gives `VilaHD.forward`), B conversations, N images:
    input_ids       long [B, L]   right-padded; one `image_token_id` per image placeholder
    attention_mask  bool [B, L]
    labels          long [B, L]   -100 except assistant answer tokens (all -100 for grounding)
    prompt_end      long [B]      index in input_ids of the last token of the first user turn
                                  (the top-down prompt is the LLM state there)
    images          uint8 [N, 3, S, S]  squash-resized to the PS3 preset's top scale, in order of
                                  appearance (sample by sample, placeholder by placeholder)
    image_sizes     long [N, 2]   original (width, height): dynamic resolution at 4K uses it
    boxes           float [N, 4]  (x0, y0, x1, y1) normalised to 0..1 of the image; 0 where none
    has_box         bool [N]
    grounding       bool [B]      the whole micro-batch is grounding or none of it is
    ids             list[str]
"""
