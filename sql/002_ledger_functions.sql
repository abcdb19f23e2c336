-- Ledger functions: the only writers of points_balances and points_transactions.
-- Each call is one atomic step: the balance row is locked by the UPDATE/upsert, the ledger row
-- is inserted under the unique idempotency key in the same transaction.
--
-- SQLSTATEs (class CR, credit-recon):
--   CR001 insufficient credits            CR002 idempotency key reused with other parameters
--   CR003 invalid amount                  CR004 invalid argument (user id, type, key)
--   CR010 ledger is append-only

-- The answer to a replayed key: the first result, or CR002 when the key names another write.
CREATE FUNCTION public.ledger_replay(p_key text, p_user_id uuid, p_delta bigint, p_transaction_type text)
RETURNS TABLE (new_balance bigint, transaction_id bigint, duplicate boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    r record;
BEGIN
    SELECT t.id, t.user_id, t.amount, t.transaction_type, t.balance_after INTO r
      FROM public.points_transactions t WHERE t.idempotency_key = p_key;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF r.user_id <> p_user_id OR r.amount <> p_delta OR r.transaction_type <> p_transaction_type THEN
        RAISE EXCEPTION 'idempotency key % was already used for another write', p_key
            USING ERRCODE = 'CR002',
                  DETAIL = format('first write: user %s, amount %s, type %s; this call: user %s, amount %s, type %s',
                                  r.user_id, r.amount, r.transaction_type, p_user_id, p_delta, p_transaction_type);
    END IF;
    RETURN QUERY SELECT r.balance_after, r.id, true;
END $$;

-- Validation shared by every writer: one place for the argument rules.
CREATE FUNCTION public.ledger_validate(p_user_id uuid, p_amount bigint, p_transaction_type text,
                                       p_direction smallint, p_idempotency_key text)
RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_dir smallint;
    v_max bigint;
BEGIN
    IF p_user_id IS NULL THEN
        RAISE EXCEPTION 'user id is required' USING ERRCODE = 'CR004';
    END IF;
    IF p_amount IS NULL OR p_amount <= 0 THEN
        RAISE EXCEPTION 'amount must be a positive whole number of credits, got %', coalesce(p_amount::text, 'NULL')
            USING ERRCODE = 'CR003';
    END IF;
    SELECT s.value::bigint INTO v_max FROM public.ledger_settings s WHERE s.name = 'max_operation_amount';
    IF p_amount > v_max THEN
        RAISE EXCEPTION 'amount % exceeds the per-operation maximum of %', p_amount, v_max USING ERRCODE = 'CR003';
    END IF;
    SELECT t.direction INTO v_dir FROM public.ledger_transaction_types t WHERE t.name = p_transaction_type;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown transaction type %', coalesce(quote_literal(p_transaction_type), 'NULL')
            USING ERRCODE = 'CR004';
    END IF;
    IF v_dir <> 0 AND v_dir <> p_direction THEN
        RAISE EXCEPTION 'transaction type % cannot be used to % credits', p_transaction_type,
            CASE WHEN p_direction > 0 THEN 'add' ELSE 'deduct' END USING ERRCODE = 'CR004';
    END IF;
    IF p_idempotency_key IS NOT NULL AND (length(p_idempotency_key) = 0 OR length(p_idempotency_key) > 512) THEN
        RAISE EXCEPTION 'idempotency key must be 1 to 512 characters' USING ERRCODE = 'CR004';
    END IF;
END $$;

-- The one implementation of a ledger write; p_delta is signed.
CREATE FUNCTION public.ledger_apply(p_user_id uuid, p_delta bigint, p_transaction_type text, p_description text,
                                    p_idempotency_key text, p_metadata jsonb)
RETURNS TABLE (new_balance bigint, transaction_id bigint, duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_key text := coalesce(p_idempotency_key, 'auto:' || gen_random_uuid()::text);
    v_abs bigint := abs(p_delta);
    v_new bigint;
    v_have bigint;
    v_id bigint;
BEGIN
    -- a retried call: answer with the first result, lock nothing
    IF p_idempotency_key IS NOT NULL THEN
        RETURN QUERY SELECT * FROM public.ledger_replay(v_key, p_user_id, p_delta, p_transaction_type);
        IF FOUND THEN RETURN; END IF;
    END IF;

    IF p_delta > 0 THEN
        INSERT INTO public.points_balances AS b (user_id, balance, lifetime_earned, updated_at)
        VALUES (p_user_id, p_delta, p_delta, now())
        ON CONFLICT (user_id) DO UPDATE
            SET balance = b.balance + excluded.balance,
                lifetime_earned = b.lifetime_earned + excluded.lifetime_earned,
                updated_at = excluded.updated_at
        RETURNING b.balance INTO v_new;
    ELSE
        UPDATE public.points_balances b
           SET balance = b.balance - v_abs, lifetime_spent = b.lifetime_spent + v_abs, updated_at = now()
         WHERE b.user_id = p_user_id AND b.balance - b.reserved >= v_abs
        RETURNING b.balance INTO v_new;
        IF NOT FOUND THEN
            -- a concurrent caller may have used this key while we waited for the row lock
            IF p_idempotency_key IS NOT NULL THEN
                RETURN QUERY SELECT * FROM public.ledger_replay(v_key, p_user_id, p_delta, p_transaction_type);
                IF FOUND THEN RETURN; END IF;
            END IF;
            SELECT b.balance - b.reserved INTO v_have FROM public.points_balances b WHERE b.user_id = p_user_id;
            RAISE EXCEPTION 'insufficient credits: user % has % spendable, needs %', p_user_id, coalesce(v_have, 0), v_abs
                USING ERRCODE = 'CR001',
                      DETAIL = json_build_object('user_id', p_user_id, 'spendable', coalesce(v_have, 0),
                                                 'requested', v_abs)::text;
        END IF;
    END IF;

    INSERT INTO public.points_transactions AS t
        (user_id, amount, balance_after, transaction_type, description, idempotency_key, metadata)
    VALUES (p_user_id, p_delta, v_new, p_transaction_type, p_description, v_key, coalesce(p_metadata, '{}'::jsonb))
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING t.id INTO v_id;

    IF v_id IS NULL THEN
        -- lost the race for this key to a concurrent caller: undo our change (the row is still ours)
        UPDATE public.points_balances b
           SET balance = b.balance - p_delta,
               lifetime_earned = b.lifetime_earned - greatest(p_delta, 0),
               lifetime_spent = b.lifetime_spent - greatest(-p_delta, 0)
         WHERE b.user_id = p_user_id;
        RETURN QUERY SELECT * FROM public.ledger_replay(v_key, p_user_id, p_delta, p_transaction_type);
        RETURN;
    END IF;

    RETURN QUERY SELECT v_new, v_id, false;
END $$;

CREATE FUNCTION public.add_points(p_user_id uuid, p_amount bigint, p_transaction_type text, p_description text,
                                  p_idempotency_key text DEFAULT NULL, p_metadata jsonb DEFAULT '{}'::jsonb)
RETURNS TABLE (new_balance bigint, transaction_id bigint, duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    PERFORM public.ledger_validate(p_user_id, p_amount, p_transaction_type, 1::smallint, p_idempotency_key);
    RETURN QUERY SELECT * FROM public.ledger_apply(p_user_id, p_amount, p_transaction_type, p_description,
                                                   p_idempotency_key, p_metadata);
END $$;

CREATE FUNCTION public.deduct_points(p_user_id uuid, p_amount bigint, p_transaction_type text, p_description text,
                                     p_idempotency_key text DEFAULT NULL, p_metadata jsonb DEFAULT '{}'::jsonb)
RETURNS TABLE (new_balance bigint, transaction_id bigint, duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    PERFORM public.ledger_validate(p_user_id, p_amount, p_transaction_type, (-1)::smallint, p_idempotency_key);
    RETURN QUERY SELECT * FROM public.ledger_apply(p_user_id, -p_amount, p_transaction_type, p_description,
                                                   p_idempotency_key, p_metadata);
END $$;

-- A refused deduction rolls back its own transaction, so callers record the attempt with this
-- separate call (the Python module does it for every CR001); the audit counts these rows.
CREATE FUNCTION public.record_failed_deduction(p_user_id uuid, p_amount bigint, p_reason text DEFAULT 'insufficient_credits',
                                               p_idempotency_key text DEFAULT NULL)
RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = '' AS $$
    INSERT INTO public.points_deduction_failures (user_id, amount, balance, reason, idempotency_key)
    SELECT p_user_id, p_amount, (SELECT b.balance FROM public.points_balances b WHERE b.user_id = p_user_id),
           left(coalesce(p_reason, 'insufficient_credits'), 200), left(p_idempotency_key, 512)
    RETURNING id;
$$;

-- Free tier: one claim per job, at most the configured number per UTC day, counted here.
CREATE FUNCTION public.claim_free_generation(p_user_id uuid, p_job_id text)
RETURNS TABLE (allowed boolean, used_today integer, daily_limit integer, duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_day date := (now() AT TIME ZONE 'UTC')::date;
    v_limit integer;
    v_used integer;
BEGIN
    IF p_user_id IS NULL OR p_job_id IS NULL OR length(p_job_id) = 0 OR length(p_job_id) > 512 THEN
        RAISE EXCEPTION 'user id and a job id of 1 to 512 characters are required' USING ERRCODE = 'CR004';
    END IF;
    SELECT s.value::integer INTO v_limit FROM public.ledger_settings s WHERE s.name = 'free_daily_limit';
    v_limit := coalesce(v_limit, 0);
    PERFORM pg_advisory_xact_lock(hashtextextended(p_user_id::text, 0));
    SELECT count(*) INTO v_used FROM public.free_generation_claims c WHERE c.user_id = p_user_id AND c.day = v_day;
    IF EXISTS (SELECT 1 FROM public.free_generation_claims c WHERE c.job_id = p_job_id) THEN
        RETURN QUERY SELECT true, v_used, v_limit, true;
        RETURN;
    END IF;
    IF v_used >= v_limit THEN
        RETURN QUERY SELECT false, v_used, v_limit, false;
        RETURN;
    END IF;
    INSERT INTO public.free_generation_claims (job_id, user_id, day) VALUES (p_job_id, p_user_id, v_day);
    RETURN QUERY SELECT true, v_used + 1, v_limit, false;
END $$;

-- The app's id resolution, set-based: mapping, else the first valid UUID in the subscription
-- metadata (resolved_supabase_user_id, supabase_user_id, original_userId), else the BestAuth id.
CREATE FUNCTION public.uuid_or_null(p text) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = '' AS $$
    SELECT CASE WHEN p ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN p::uuid END
$$;

CREATE VIEW public.user_id_resolution AS
SELECT u.id AS bestauth_user_id,
       m.supabase_user_id AS mapped_user_id,
       coalesce(public.uuid_or_null(s.metadata ->> 'resolved_supabase_user_id'),
                public.uuid_or_null(s.metadata ->> 'supabase_user_id'),
                public.uuid_or_null(s.metadata ->> 'original_userId')) AS metadata_user_id,
       coalesce(m.supabase_user_id,
                public.uuid_or_null(s.metadata ->> 'resolved_supabase_user_id'),
                public.uuid_or_null(s.metadata ->> 'supabase_user_id'),
                public.uuid_or_null(s.metadata ->> 'original_userId'),
                u.id) AS user_id,
       CASE WHEN m.supabase_user_id IS NOT NULL THEN 'mapping'
            WHEN coalesce(public.uuid_or_null(s.metadata ->> 'resolved_supabase_user_id'),
                          public.uuid_or_null(s.metadata ->> 'supabase_user_id'),
                          public.uuid_or_null(s.metadata ->> 'original_userId')) IS NOT NULL THEN 'metadata'
            ELSE 'bestauth_id' END AS source
  FROM public.bestauth_users u
  LEFT JOIN public.user_id_mapping m ON m.bestauth_user_id = u.id
  LEFT JOIN public.subscriptions_consolidated s ON s.user_id = u.id;

CREATE FUNCTION public.resolve_user_ids(p_bestauth_ids uuid[])
RETURNS TABLE (bestauth_user_id uuid, user_id uuid, source text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = '' AS $$
    SELECT r.bestauth_user_id, r.user_id, r.source
      FROM public.user_id_resolution r
     WHERE r.bestauth_user_id = ANY (p_bestauth_ids)
$$;

-- Least privilege: no one but the service role (granted after migration) calls the writers.
REVOKE EXECUTE ON FUNCTION
    public.ledger_replay(text, uuid, bigint, text),
    public.ledger_validate(uuid, bigint, text, smallint, text),
    public.ledger_apply(uuid, bigint, text, text, text, jsonb),
    public.add_points(uuid, bigint, text, text, text, jsonb),
    public.deduct_points(uuid, bigint, text, text, text, jsonb),
    public.record_failed_deduction(uuid, bigint, text, text),
    public.claim_free_generation(uuid, text),
    public.resolve_user_ids(uuid[])
FROM PUBLIC;
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON public.points_balances, public.points_transactions FROM PUBLIC;

-- The one spelling of a period's grant key, used by the webhook handler, the audit and its fixes.
CREATE FUNCTION public.subscription_grant_key(p_subscription_id uuid, p_period_start timestamptz)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = '' AS $$
    SELECT 'subscription_grant:' || p_subscription_id::text || ':'
           || to_char(p_period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD')
$$;
