-- Databases of the compose stack: Temporal's own two, and the registry of the orchestrator.
CREATE DATABASE temporal;
CREATE DATABASE temporal_visibility;
CREATE DATABASE onex;
