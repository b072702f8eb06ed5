package sourcebeam.tools;

import java.util.Arrays;
import org.apache.beam.sdk.expansion.service.ExpansionService;

/**
 * Beam's ExpansionService with EMBEDDED as the default Java environment.
 *
 * <p>Why: without Docker, the Java half of a cross-language transform (ReadFromKafka,
 * WriteToKafka) can only run EMBEDDED in the Flink TaskManagers or on the expansion
 * service's loopback worker (Prism). Beam's default environment is Docker, and Beam's
 * Python SDK starts this jar with its own arguments, so the default is set here unless
 * the caller passes --defaultEnvironmentType itself.
 */
public final class ExpansionServiceMain {
  private ExpansionServiceMain() {}

  public static void main(String[] args) throws Exception {
    boolean hasEnvironment = false;
    for (String arg : args) {
      if (arg.startsWith("--defaultEnvironmentType")) {
        hasEnvironment = true;
      }
    }
    String[] all = args;
    if (!hasEnvironment) {
      all = Arrays.copyOf(args, args.length + 1);
      all[args.length] = "--defaultEnvironmentType=EMBEDDED";
    }
    ExpansionService.main(all);
  }
}
