"""Imports: files of past events pulled or uploaded into an account's pipeline."""
