"""Airflow hooks: each wraps one external system behind an Airflow connection."""
