-- A role and a database for each service (the passwords are compose.yaml's, for one machine).
CREATE ROLE forms LOGIN PASSWORD 'forms';
CREATE DATABASE forms OWNER forms;
CREATE ROLE identity LOGIN PASSWORD 'identity';
CREATE DATABASE identity OWNER identity;
CREATE ROLE routing LOGIN PASSWORD 'routing';
CREATE DATABASE routing OWNER routing;
CREATE ROLE eaddress LOGIN PASSWORD 'eaddress';
CREATE DATABASE eaddress OWNER eaddress;
