"""The image-editing application on top of the core (``pip install -e ".[editing]"``).

    images.py      decoding image files safely (PNG, JPEG, WebP; sizes checked first; one error type)
    text.py        cleaning instructions
    ops.py         the edit operators with exact targets
    phrasings.py   training and held-out phrasings per edit, the keyword-disjointness check
    data.py        photos from installed wheels or a folder, crops
    tasks.py       task instances (values, compositions), the benchmark's splits, examples
    editor.py      the frozen MMDiT-style base editor
    pretrain.py    its cached pretraining
    conditions.py  frozen condition encoders and the condition projector
    methods.py     the compared methods, each with ``predict(batch)``
    metrics.py     PSNR / SSIM
    rundir.py      the run directory every command saves and loads
    apply.py       ``funcmem edit``: one image of any size, in bounded work (tile limit, chunks, strips),
                   overlapping tiles cross-faded (no seams)
    benchmark/     ``funcmem demo`` / ``funcmem eval``: every method, analyses, report
    continual/     ``funcmem continual``: edits taught in stages, forgetting, removal
"""
