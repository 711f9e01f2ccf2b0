"""The work of each stage: plain functions, no Prefect or DVC imports."""
