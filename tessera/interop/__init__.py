"""Hugging Face interop: import LLaVA and Llama 3.2 Vision checkpoints into tessera's modules, export back.

    MultimodalLM.from_pretrained(hf_dir)         # any LlavaForConditionalGeneration / MllamaForConditionalGeneration
    tessera convert HF_DIR OUT_DIR               # once, to a tessera checkpoint
    tessera export CK OUT_DIR --format hf        # a checkpoint transformers' from_pretrained loads

One module per concern: hub_files (config.json, safetensors shards), name_map (tensor renames/fusions),
text_models and vision_towers (per-family configs and names), llava and mllama (the two architectures),
convert / export (the two directions), chat_template, image_processing and processor (the text and image side).
"""
