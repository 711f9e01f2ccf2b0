-- Run once by the postgres image on an empty data volume: MLflow's database is
-- POSTGRES_DB (mlflow); Prefect's server gets its own, owned by the same user.
CREATE DATABASE prefect;
