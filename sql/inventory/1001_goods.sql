CREATE TABLE goods (
    id    uuid PRIMARY KEY,
    name  text NOT NULL,
    stock int  NOT NULL CHECK (stock >= 0)
);
