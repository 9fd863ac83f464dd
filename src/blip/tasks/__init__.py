"""Tasks: what a user asks for, batched. The CLI, server, batch jobs and CapFilt all call these."""
