"""The memory planner (`hataori plan`)."""
