"""The sampling engines: hf.py (tribunal's decode loop, captures while it decodes) and vllm.py (vLLM samples, teacher
forcing captures). Each imports neither the other nor generate.py, which picks one."""
