"""Coverage-guided fuzz harnesses (atheris); see fuzz/README.md."""
