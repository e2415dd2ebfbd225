"""ModelOps: a governed model lifecycle on Apache Airflow 3."""
