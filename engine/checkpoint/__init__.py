"""Checkpoint folders in the published Wan2.2-S2V-14B + Live-Avatar layout: inspect, load, write.

- `layout`: where each file lives; `files`: header readers with teaching errors;
- `dit_config`: config.json -> DiTConfig; `lora`: LoRA keys and merge;
- `inspect`: header/meta-only validation (`check_checkpoint`); `report`: the load report;
- `loader`: strict loading onto device and dtype, with progress; `tiny`: the tiny random layout.
"""
