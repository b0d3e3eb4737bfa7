from setuptools import find_packages, setup

SERVE = ["starlette>=0.37", "uvicorn>=0.30", "pydantic>=2.6", "jinja2>=3.1", "prometheus_client>=0.20"]

setup(
    name="ernie-paddle",
    version="0.1.0",
    description="PaddlePaddle-native inference for Baidu ERNIE 4.5: converters, predictor, checker, deployment",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ernie_paddle", "ernie_paddle.*", "converters", "converters.*"]),
    package_data={"ernie_paddle": ["assets/*/*", "csrc/*.cc", "csrc/*.h"]},
    # No hard `paddlepaddle` requirement: GPU and NPU users bring their own Paddle build.
    install_requires=["numpy>=1.24", "safetensors>=0.4", "sentencepiece>=0.1.99", "tqdm>=4.60", "pyyaml>=6"],
    extras_require={
        "cpu": ["paddlepaddle>=3.1,<4"],
        "check": ["torch==2.13.0", "transformers>=4.54"],
        "test": ["pytest>=7", "hypothesis>=6.100", "torch==2.13.0", "transformers>=4.54", "openai>=1.40", "httpx>=0.27",
                 *SERVE],
        "hub": ["huggingface_hub>=0.20"],
        "serve": SERVE,
    },
    entry_points={"console_scripts": ["ernie-paddle=ernie_paddle.cli:main", "convert=converters.cli:main"]},
)
