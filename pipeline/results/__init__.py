"""Ensembles of generations, the report's tables, the paired table of controls."""
