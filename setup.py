from setuptools import setup

setup(
    name="ropefast",
    version="0.1.0",
    description="Scaled rotary attention: RoPE frequency scaling + temperature + flash attention in Triton",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The top-level kernels/ folder installs as ropefast.kernels (the bare name is taken on PyPI).
    packages=["ropefast", "ropefast.schedules", "ropefast.distributed", "ropefast.integrations", "ropefast.kernels",
              "ropefast.kernels.hopper"],
    package_dir={"ropefast.kernels": "kernels"},
    install_requires=["torch>=2.4", "triton>=3.2", "einops"],
    extras_require={"dev": ["pytest", "pytest-benchmark", "pytest-timeout", "transformers>=5.24,<6", "matplotlib"]},
)
