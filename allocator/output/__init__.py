"""Stage 5, ranks -> what the user keeps: the :class:`Plan`, its PEFT export, the report and the lora_A inits.

``plan`` (``Plan``: save, load, apply), ``export`` (``LoraConfig`` keyword arguments, PEFT matching),
``report`` (report.md and heatmap.png), ``lora_init`` (EVA's init at the plan's ranks). Folders are written by
``probes.folders``, the one safe writer.
"""
