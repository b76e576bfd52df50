-- The provincial source of the compose demo: a citizens table and a replication user for the agent.
CREATE TABLE citizens (
    citizen_id    char(12) PRIMARY KEY,
    full_name     text NOT NULL,
    birth_date    date,
    province_code varchar(2) NOT NULL,
    commune_code  varchar(5) NOT NULL,
    address       text
);
INSERT INTO citizens VALUES
    ('079090000001', 'Nguyễn Văn An', '1990-05-01', '79', '26740', 'Số 12 Lê Lợi, Phường Sài Gòn'),
    ('079085000002', 'Trần Thị Bích', '1985-11-20', '79', '26743', 'Số 8 Hai Bà Trưng, Phường Tân Định');
CREATE ROLE dongbo LOGIN REPLICATION PASSWORD 'dongbo';
GRANT SELECT ON citizens TO dongbo;
GRANT CREATE ON DATABASE population TO dongbo;
