"""Experiment orchestration: work directory, stages (data, teachers, settings, evaluation, report), CLI."""
