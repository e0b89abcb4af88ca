"""spiral_rl: closed-loop GRPO post-training for action world models.

torch is deliberately a range, not a pin: on GPU clusters it must accept the CUDA build already
installed. The README's commands install `torch==2.13.0` first, so on a CPU box pip never
resolves the range to a multi-GB CUDA wheel.
"""
from setuptools import find_packages, setup

setup(
    name="spiral_rl",
    version="0.1.0",
    description="Think-act-reflect RL post-training (GRPO) for action world models, on Ray and DeepSpeed",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["spiral_rl", "spiral_rl.*", "actors", "actors.*"]),
    install_requires=[
        "torch>=2.4,<=2.13.0",
        "numpy>=1.26,<3",
        "omegaconf==2.4.0",
        "imageio==2.38.1",
        "imageio-ffmpeg==0.8.1",
        "pillow>=10",
    ],
    extras_require={
        # distributed training: Ray actors and the DeepSpeed learner group
        "dist": ["ray[default,train]==2.60.0", "deepspeed==0.19.8", "tensorboard>=2.16"],
        # real backbones: diffusers video transformers and transformers planners / critics
        "vlm": ["diffusers==0.42.1", "transformers==5.23.0", "safetensors>=0.4"],
        "dev": [
            "ray[default,train]==2.60.0", "deepspeed==0.19.8", "tensorboard>=2.16",
            "diffusers==0.42.1", "transformers==5.23.0", "safetensors>=0.4",
            "pytest>=8", "matplotlib>=3.8",
        ],
    },
)
