package sourcebeam.tools;

import java.util.Arrays;

/**
 * The expansion service for pipelines that run on Flink: {@link ExpansionServiceMain} plus
 * {@code --experiments=use_deprecated_read}.
 *
 * <p>Why: the portable Flink runner of Beam 2.70 cannot checkpoint an unbounded splittable
 * DoFn, so KafkaIO's SDF read never hands its records downstream in a streaming job
 * (apache/beam#20979, #19637). With this experiment KafkaIO expands to the legacy
 * {@code Read(KafkaUnboundedSource)}, which Flink runs as a native source. It must be an
 * expansion-service argument: the same experiment in the pipeline's options does not change
 * how KafkaIO expands. Prism cannot run the legacy read, so this is Flink's launcher only.
 */
public final class FlinkExpansionServiceMain {
  private FlinkExpansionServiceMain() {}

  public static void main(String[] args) throws Exception {
    String[] all = Arrays.copyOf(args, args.length + 1);
    all[args.length] = "--experiments=use_deprecated_read";
    ExpansionServiceMain.main(all);
  }
}
