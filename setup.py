"""rlhf-ds: PPO-RLHF on DeepSpeed. Runtime requirements are read from requirements.txt (one list, two ways)."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
REQUIREMENTS = [
    line.strip()
    for line in (HERE / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="rlhf-ds",
    version="0.1.0",
    description="PPO-RLHF trainer on DeepSpeed: Qwen2 actor/critic, DeBERTa reward model, HH-RLHF prompts",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    # ds_configs/ ships beside the package (engines.py reads it from there), as a data-only package.
    packages=find_packages(include=["rlhf_ds", "rlhf_ds.*"]) + ["ds_configs"],
    package_data={"ds_configs": ["*.json"]},
    python_requires=">=3.10",
    install_requires=REQUIREMENTS,
    extras_require={"test": ["pytest>=8.0", "pyarrow>=15"]},
)
