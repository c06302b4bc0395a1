"""Reading runs back and reporting on them: run folders and tables (runs), the paper's params and
FLOPs (flops), loading a run's model (models)."""
