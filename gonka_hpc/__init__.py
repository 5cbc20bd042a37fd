"""gonka-hpc: decentralized, verifiable LLM inference on HPC clusters.

The core package: config, identities and signatures, canonical encoding, job files,
engines, seeded sampling, artifacts, transfer agent, ML-node worker and the CLI.
It never imports `ledger` or `verify` (only `gonka_hpc.cli` does).
"""

__version__ = "0.1.0"
