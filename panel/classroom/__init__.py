"""Classroom mode: a class of students, each with a server of their own."""
